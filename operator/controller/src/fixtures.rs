//! Test builders and an in-memory Kubernetes API server.
//!
//! Why an in-memory fake rather than kube's `tower_test::mock::pair` with an
//! `ApiServerVerifier`: a StorageGateway reconcile makes a dozen requests whose order depends
//! on what exists (per node: apply the Gateway, read the pod, maybe apply it), and deletion
//! spans several reconciles of two controllers. A verifier scripted request by request would
//! pin that order and break on every harmless reordering; a fake that stores objects and
//! answers GET, LIST, POST, PUT, PATCH and DELETE lets a test state what a user would see
//! (which pods exist, with which fields) after the reconciles, whatever the order.
//!
//! What it simplifies: server-side apply merges into the stored object (maps recursively;
//! lists of objects with a `type` key merged by that key, other lists replaced) and does not
//! track field ownership; list selectors are `key=value` equality and `key` existence only; deletion is immediate
//! unless the object has finalizers; there is no garbage collection and no admission.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use blockgate_operator_api::StorageGateway;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Secret, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use serde_json::{Value, json};

/// A request the fake served: method, path (without query) and field manager if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub field_manager: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Collection path (`/api/v1/namespaces/ns/pods`) → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    next_version: u64,
    served: Vec<Served>,
}

/// The in-memory API server. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// Where a request points.
struct Target {
    collection: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Prefix: api/v1 or apis/group/version.
    let prefix_len = match parts.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    let rest = &parts[prefix_len..];
    let (scope_len, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (prefix_len + 3, &rest[2..])
    } else {
        (prefix_len + 1, rest)
    };
    let collection = format!("/{}", parts[..scope_len].join("/"));
    Some(Target {
        collection,
        name: rest.get(1).map(|s| (*s).to_owned()),
        status: rest.get(2) == Some(&"status"),
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn lookup<'a>(object: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(object, |v, k| v.get(k))
}

fn selected(object: &Value, labels: Option<&str>, fields: Option<&str>) -> bool {
    let pairs = |s: Option<&str>| -> Vec<(String, Option<String>)> {
        s.unwrap_or("")
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                // `key` alone: the label exists, whatever its value.
                None => (p.to_owned(), None),
            })
            .collect()
    };
    pairs(labels).iter().all(|(k, v)| {
        let actual = object["metadata"]["labels"].get(k).and_then(Value::as_str);
        match v {
            Some(v) => actual == Some(v.as_str()),
            None => actual.is_some(),
        }
    }) && pairs(fields)
        .iter()
        .all(|(k, v)| lookup(object, k).and_then(Value::as_str) == v.as_deref())
}

/// Server-side apply, simplified: see the module doc.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (Value::Array(t), Value::Array(p))
            if p.iter().all(|e| e.get("type").is_some())
                && t.iter().all(|e| e.get("type").is_some()) =>
        {
            for entry in p {
                match t.iter_mut().find(|e| e["type"] == entry["type"]) {
                    Some(existing) => *existing = entry.clone(),
                    None => t.push(entry.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn pointer_parent<'a>(object: &'a mut Value, path: &str) -> (&'a mut Value, String) {
    let (parent, last) = path.rsplit_once('/').unwrap();
    (object.pointer_mut(parent).unwrap(), last.to_owned())
}

/// RFC 6902, the operations kube's finalizer helper sends.
fn json_patch(object: &mut Value, operations: &[Value]) -> Result<(), String> {
    let mut working = object.clone();
    for op in operations {
        let path = op["path"].as_str().unwrap();
        match op["op"].as_str().unwrap() {
            "test" => {
                let actual = working.pointer(path).cloned().unwrap_or(Value::Null);
                if actual != op["value"] {
                    return Err(format!("test {path} failed"));
                }
            }
            "add" | "replace" => {
                let (parent, last) = pointer_parent(&mut working, path);
                match parent {
                    Value::Array(items) if last == "-" => items.push(op["value"].clone()),
                    Value::Array(items) => items.insert(last.parse().unwrap(), op["value"].clone()),
                    Value::Object(map) => {
                        map.insert(last, op["value"].clone());
                    }
                    _ => return Err(format!("bad path {path}")),
                }
            }
            "remove" => {
                let (parent, last) = pointer_parent(&mut working, path);
                match parent {
                    Value::Array(items) => {
                        items.remove(last.parse::<usize>().unwrap());
                    }
                    Value::Object(map) => {
                        map.remove(&last);
                    }
                    _ => return Err(format!("bad path {path}")),
                }
            }
            other => return Err(format!("unsupported op {other}")),
        }
    }
    *object = working;
    Ok(())
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

impl State {
    fn bump(&mut self, object: &mut Value) {
        self.next_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
    }

    fn create(&mut self, collection: &str, mut object: Value) -> Value {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        if let Some(ns) = collection.split("/namespaces/").nth(1) {
            let ns = ns.split('/').next().unwrap();
            object["metadata"]["namespace"] = json!(ns);
        }
        object["metadata"]["uid"] = json!(format!("uid-{name}"));
        object["metadata"]["generation"] = json!(1);
        object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.bump(&mut object);
        self.objects
            .entry(collection.to_owned())
            .or_default()
            .insert(name, object.clone());
        object
    }

    fn handle(
        &mut self,
        method: &Method,
        target: &Target,
        query: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let not_found = |what: &str| {
            (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", &format!("{what} not found")),
            )
        };
        let collection = target.collection.clone();
        match (method.as_str(), &target.name) {
            ("GET", None) => {
                let labels = query_param(query, "labelSelector");
                let fields = query_param(query, "fieldSelector");
                let items: Vec<Value> = self
                    .objects
                    .get(&collection)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| selected(o, labels.as_deref(), fields.as_deref()))
                    .cloned()
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": self.next_version.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name)) => match self.objects.get(&collection).and_then(|m| m.get(name)) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => not_found(name),
            },
            ("POST", None) => {
                let object: Value = serde_json::from_slice(body).unwrap();
                let name = object["metadata"]["name"].as_str().unwrap().to_owned();
                if self.get(&collection, &name).is_some() {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "AlreadyExists", "already exists"),
                    );
                }
                (StatusCode::CREATED, self.create(&collection, object))
            }
            ("PUT", Some(name)) => {
                let mut object: Value = serde_json::from_slice(body).unwrap();
                let Some(stored) = self.get(&collection, name) else {
                    return not_found(name);
                };
                if object["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                for key in ["uid", "creationTimestamp", "generation", "namespace"] {
                    object["metadata"][key] = stored["metadata"][key].clone();
                }
                self.bump(&mut object);
                self.put(&collection, name, object.clone());
                (StatusCode::OK, object)
            }
            ("PATCH", Some(name)) => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                let stored = self.get(&collection, name);
                let is_apply = content_type == Some("application/apply-patch+yaml");
                let mut object = match stored {
                    Some(object) => object,
                    None if is_apply && !target.status => {
                        return (StatusCode::CREATED, self.create(&collection, patch));
                    }
                    None => return not_found(name),
                };
                let spec_before = object.get("spec").cloned();
                if content_type == Some("application/json-patch+json") {
                    if let Err(message) = json_patch(&mut object, patch.as_array().unwrap()) {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            status_body(422, "Invalid", &message),
                        );
                    }
                } else if target.status {
                    merge(&mut object["status"], &patch["status"]);
                } else {
                    let mut patch = patch;
                    // The status subresource ignores status in main-resource writes.
                    if let Some(map) = patch.as_object_mut() {
                        map.remove("status");
                    }
                    merge(&mut object, &patch);
                }
                if object.get("spec").cloned() != spec_before {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(0);
                    object["metadata"]["generation"] = json!(generation + 1);
                }
                // An object being deleted goes when its last finalizer does.
                let finalizers_empty = object["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty);
                if object["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
                    self.remove(&collection, name);
                    return (StatusCode::OK, object);
                }
                self.bump(&mut object);
                self.put(&collection, name, object.clone());
                (StatusCode::OK, object)
            }
            ("DELETE", Some(name)) => {
                let Some(mut object) = self.get(&collection, name) else {
                    return not_found(name);
                };
                let has_finalizers = object["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if has_finalizers {
                    object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                    self.bump(&mut object);
                    self.put(&collection, name, object.clone());
                } else {
                    self.remove(&collection, name);
                }
                (StatusCode::OK, object)
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_body(405, "MethodNotAllowed", "not supported by the fake"),
            ),
        }
    }

    fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.objects.get(collection)?.get(name).cloned()
    }

    fn put(&mut self, collection: &str, name: &str, object: Value) {
        self.objects
            .entry(collection.to_owned())
            .or_default()
            .insert(name.to_owned(), object);
    }

    fn remove(&mut self, collection: &str, name: &str) {
        if let Some(map) = self.objects.get_mut(collection) {
            map.remove(name);
        }
    }
}

impl FakeApi {
    /// A client talking to a new fake, and the fake.
    pub fn client() -> (Client, FakeApi) {
        let fake = FakeApi::default();
        (Client::new(fake.clone(), "default"), fake)
    }

    /// Stores an object as a user would create it.
    pub fn insert(&self, collection: &str, object: impl serde::Serialize) -> Value {
        let value = serde_json::to_value(object).unwrap();
        self.state.lock().unwrap().create(collection, value)
    }

    /// The stored object, if any.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().get(collection, name)
    }

    /// Names in a collection.
    pub fn names(&self, collection: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(collection)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes a stored object in place (what another actor, e.g. the kubelet, would do).
    pub fn edit(&self, collection: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().unwrap();
        let mut object = state.get(collection, name).unwrap();
        change(&mut object);
        state.bump(&mut object);
        state.put(collection, name, object);
    }

    /// Removes an object outright (garbage collection, a kubelet finishing a pod).
    pub fn remove(&self, collection: &str, name: &str) {
        self.state.lock().unwrap().remove(collection, name);
    }

    /// The requests served so far.
    pub fn served(&self) -> Vec<Served> {
        self.state.lock().unwrap().served.clone()
    }
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let path = parts.uri.path().to_owned();
            let query = parts.uri.query().unwrap_or("").to_owned();
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut state = state.lock().unwrap();
            state.served.push(Served {
                method: parts.method.to_string(),
                path: path.clone(),
                field_manager: query_param(&query, "fieldManager"),
                content_type: content_type.clone(),
            });
            let (code, value) = match parse_path(&path) {
                Some(target) => state.handle(
                    &parts.method,
                    &target,
                    &query,
                    content_type.as_deref(),
                    &body,
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", "unknown path"),
                ),
            };
            let body = Full::new(Bytes::from(serde_json::to_vec(&value).unwrap()));
            Ok(Response::builder().status(code).body(body).unwrap())
        })
    }
}

/// Collection paths used by the tests.
pub const NODES: &str = "/api/v1/nodes";
pub const SECRETS: &str = "/api/v1/namespaces/blockgate-system/secrets";
pub const PODS: &str = "/api/v1/namespaces/blockgate-system/pods";
pub const GATEWAYS: &str = "/apis/blockgate.io/v1alpha1/namespaces/blockgate-system/gateways";
pub const STORAGE_GATEWAYS: &str =
    "/apis/blockgate.io/v1alpha1/namespaces/blockgate-system/storagegateways";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/blockgate-system/leases";
/// Where kube's event [`kube::runtime::events::Recorder`] creates Events (events.k8s.io/v1):
/// the fake stores them like any object, so a test reads what `kubectl get events` would list.
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/blockgate-system/events";

/// The example StorageGateway of `crds/examples` without the encryption key, bandwidth and
/// maintenance window: node selector `blockgate.io/gateway=true`, a toleration of
/// `storage=dedicated:NoSchedule`, credentials in Secret `s3-credentials`.
pub fn storage_gateway(name: &str) -> StorageGateway {
    let yaml = format!(
        r#"{{
  "apiVersion": "blockgate.io/v1alpha1", "kind": "StorageGateway",
  "metadata": {{"name": "{name}", "namespace": "blockgate-system", "uid": "uid-{name}", "generation": 1}},
  "spec": {{
    "image": "ghcr.io/blockgate/gateway", "version": "0.1.0",
    "nodeSelector": {{"blockgate.io/gateway": "true"}},
    "tolerations": [{{"key": "storage", "operator": "Equal", "value": "dedicated", "effect": "NoSchedule"}}],
    "writeLog": {{"path": "/var/lib/blockgate/write-log", "size": "64Gi"}},
    "cache": {{"path": "/var/lib/blockgate/cache", "size": "256Gi"}},
    "objectStore": {{
      "bucket": "blockgate-volumes", "prefix": "clusters/prod/",
      "endpoint": "https://s3.example.com:9000", "region": "us-east-1", "forcePathStyle": true,
      "credentialsSecret": {{"name": "s3-credentials"}}
    }}
  }}
}}"#
    );
    serde_json::from_str(&yaml).unwrap()
}

/// A node with labels and taints (`(key, value, effect)`).
pub fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(key, value, effect)| Taint {
                        key: (*key).into(),
                        value: (!value.is_empty()).then(|| (*value).into()),
                        effect: (*effect).into(),
                        ..Taint::default()
                    })
                    .collect(),
            ),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The credentials Secret the fixture StorageGateway names.
pub fn credentials_secret() -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("s3-credentials".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                "AWS_ACCESS_KEY_ID".to_owned(),
                ByteString(b"AKIDEXAMPLE".to_vec()),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_owned(),
                ByteString(b"wJalrXUtnFEMI".to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}
